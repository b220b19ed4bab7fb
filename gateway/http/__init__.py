"""The HTTP API: routes, middleware, request and response schemas, the OpenAPI document."""
