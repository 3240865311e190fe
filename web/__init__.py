"""The web UI's pure half: Jinja2 templates, static assets (CSS and a little vanilla JS, no
build step) and the view models and formatting the pages use. No I/O here: the api's
`api.routes.ui` reads the database and Redis, then renders these templates."""
