"""The MQTT uplink: commands in, results, telemetry and events out, store-and-forward while offline."""
