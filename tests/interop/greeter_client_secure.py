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
"""The Python implementation of the GRPC helloworld.Greeter client, over TLS with a bearer token.

greeter_client.py (the quick start client) plus credentials, the way gRPC's Python auth example
(examples/python/auth/token_based_auth_client.py) adds them: TLS channel credentials built from
an explicit root certificate, composed with access-token call credentials (sent as
`authorization: Bearer TOKEN`), and grpc.secure_channel instead of grpc.insecure_channel. Nothing
else differs from greeter_client.py: `diff greeter_client.py greeter_client_secure.py`.

The target is argv[1] or $GREETER_TARGET (default localhost:50051; it must be a name the server
certificate is issued for); the CA bundle is the file $GREETER_CA, the token $GREETER_TOKEN.
"""

from __future__ import print_function

import logging
import os
import sys

import grpc
import helloworld_pb2
import helloworld_pb2_grpc


def run(target, ca, token):
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=open(ca).read().encode()),
        grpc.access_token_call_credentials(token),
    )
    # NOTE(gRPC Python Team): .close() is possible on a channel and should be
    # used in circumstances in which the with statement does not fit the needs
    # of the code.
    print("Will try to greet world ...")
    with grpc.secure_channel(target, creds) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        response = stub.SayHello(helloworld_pb2.HelloRequest(name="you"))
        print("Greeter client received: " + response.message)
        response = stub.SayHelloAgain(helloworld_pb2.HelloRequest(name="you"))
        print("Greeter client received: " + response.message)


if __name__ == "__main__":
    logging.basicConfig()
    run(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GREETER_TARGET", "localhost:50051"),
        os.environ["GREETER_CA"], os.environ["GREETER_TOKEN"])
