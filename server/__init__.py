"""batchmax's HTTP front end and command line. Imports the engine; the engine never imports this."""
