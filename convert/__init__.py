"""lavit_convert: weight conversion between the released PyTorch layout, `lavit_train`
checkpoints and the MLX folder format. This package is where torch is used for reading."""
