"""Route modules of the api, one per surface."""
