"""Run the moto server on loopback for as long as whoever started us keeps our stdin open.

Prints the port on the first line of stdout, then blocks reading stdin; EOF (the test process
exited, however it exited) stops the server. This way no moto process outlives its tests.
"""
import sys

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
try:
    sys.stdin.read()
finally:
    server.stop()
