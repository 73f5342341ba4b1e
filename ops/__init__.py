"""Operations assets: the local stack, the gateway configuration and its generator."""
