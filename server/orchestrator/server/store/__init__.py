"""The durable store: schema, the group-commit writer and the run queries."""
