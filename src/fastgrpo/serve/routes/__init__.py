"""The server's routers, one module per route group; each route gets the server's state through the
`state.State` dependency, so a router works mounted alone on any app that holds a ServerState."""
