from chatstream_asgi.cli import main

main(prog="python -m chatstream_asgi")
