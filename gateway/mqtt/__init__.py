"""The MQTT 5 client the gateway speaks: a packet codec and a connection that holds acks until data is durable."""
