"""The gRPC front end of the data plane: Triton's GRPCInferenceService (see protos/README.md)."""
