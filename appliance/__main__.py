"""`python -m appliance` runs the `appliance` command."""

from appliance.cli import main

main()
