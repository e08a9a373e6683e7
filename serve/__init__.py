"""The chat service on Ray Serve (app, HTTP API, web UI) and the terminal chat client."""
