"""nn.Modules over kernels. Each parameter-owning module implements `load_weight(name, tensor, shard)`."""
