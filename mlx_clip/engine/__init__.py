"""The engine boundary: the Backend protocol both engines implement, the policy decided once for both (dtypes, devices, what trains, where LoRA goes), and the BLAS MLX runs on."""
