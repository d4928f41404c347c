"""The gRPC surface: interceptors and the servicer."""
