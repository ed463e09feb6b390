"""The MDM's REST API, one module per resource; all register on :data:`routes`."""

from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
