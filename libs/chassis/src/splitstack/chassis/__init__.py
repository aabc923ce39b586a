"""The splitstack service chassis: how a service reads config, talks to NATS, writes state and
events safely, serves gRPC and shuts down. No domain logic lives here."""
