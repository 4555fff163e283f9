"""Run the moto server on loopback for as long as whoever started us keeps our stdin open.

Usage: moto_server.py [PORT] [--forever]   (PORT 0 or none: a free port)

Prints the port on the first line of stdout, then blocks reading stdin; EOF (the test process
exited, however it exited) stops the server. This way no moto process outlives its tests.

--forever is for starting it by hand (`&`, nohup, </dev/null), where stdin is closed or at EOF
from the start and the default would stop the server at once: it then runs until SIGTERM or
SIGINT (Ctrl-C) instead.
"""
import signal
import sys
import threading

from moto.server import ThreadedMotoServer

args = sys.argv[1:]
forever = "--forever" in args
args = [a for a in args if a != "--forever"]

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(args[0]) if args else 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
try:
    if forever:
        # Signal handlers run in the main thread, so it must wait on something they can end.
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    else:
        sys.stdin.read()
finally:
    server.stop()
