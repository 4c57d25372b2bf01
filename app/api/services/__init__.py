"""What each request does, apart from HTTP: the routers only translate to and from it."""
