"""Fine-tuning with Accelerate: recipe -> data -> model -> loop -> export."""
