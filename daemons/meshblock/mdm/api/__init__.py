"""The MDM's REST API, one module per resource, each with its own table of routes
(``routes``, a :class:`meshblock.mdm.routing.ApiRoutes`) that ``create_app`` adds."""
