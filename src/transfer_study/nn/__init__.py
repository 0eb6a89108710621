"""Networks: devices, layers, the backbone registry, building and loading trained nets."""
