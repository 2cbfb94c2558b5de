"""Thin gRPC servicers: decode, call domain code, encode."""
