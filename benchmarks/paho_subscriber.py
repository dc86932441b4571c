"""The raw-MQTT baseline's receiving end, run as its own process: paho and nothing else.

    python -m benchmarks.paho_subscriber --port PORT --topic FILTER --expect BYTES

Prints ``ready`` once subscribed and ``done BYTES`` once at least ``BYTES`` arrived.
"""

from __future__ import annotations

import argparse
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paho_subscriber")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args(argv)
    received = 0
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, props: Any) -> None:
        c.subscribe(args.topic, 1)

    def on_subscribe(c: mqtt.Client, u: Any, mid: Any, codes: Any, props: Any) -> None:
        print("ready", flush=True)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += len(msg.payload)
        if received >= args.expect:
            print(f"done {received}", flush=True)
            c.disconnect()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    client.loop_forever()


if __name__ == "__main__":
    main()
