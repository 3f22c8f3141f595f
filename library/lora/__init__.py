"""The LoRA trainer (train_network.py's body) and the --network_module contract.

Modules: trainer (check the flags, build the run from library.training.run, the network's loss
and files), network_module (what train_network.py asks of any --network_module; docs/network_module.md).
"""
