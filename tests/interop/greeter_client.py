# Copyright 2015 gRPC authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The Python implementation of the GRPC helloworld.Greeter client.

gRPC's examples/python/helloworld/greeter_client.py with the quick start's SayHelloAgain call.
The only change: the target is taken from argv[1] or $GREETER_TARGET (default localhost:50051),
so the interop tests can point it at the server's ephemeral port. helloworld_pb2 and
helloworld_pb2_grpc must be on PYTHONPATH (the tests generate them from proto/helloworld.proto).
"""

from __future__ import print_function

import logging
import os
import sys

import grpc
import helloworld_pb2
import helloworld_pb2_grpc


def run(target):
    # NOTE(gRPC Python Team): .close() is possible on a channel and should be
    # used in circumstances in which the with statement does not fit the needs
    # of the code.
    print("Will try to greet world ...")
    with grpc.insecure_channel(target) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        response = stub.SayHello(helloworld_pb2.HelloRequest(name="you"))
        print("Greeter client received: " + response.message)
        response = stub.SayHelloAgain(helloworld_pb2.HelloRequest(name="you"))
        print("Greeter client received: " + response.message)


if __name__ == "__main__":
    logging.basicConfig()
    run(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GREETER_TARGET", "localhost:50051"))
