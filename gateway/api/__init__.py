"""The HTTP layer: Starlette endpoints over the gateway's domain modules."""
