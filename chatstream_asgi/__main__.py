from chatstream_asgi.cli import main

main()
