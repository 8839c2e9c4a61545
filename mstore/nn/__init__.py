"""Small neural-network building blocks that belong to mstore itself."""
