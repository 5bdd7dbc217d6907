"""Placement, pure functions of (model card, node profiles, request): which sharding (`sharding`),
pipeline layer ranges (`pipeline`), tensor ranks (`tensor`)."""
