"""Training: options, the Lightning module and datamodule, losses, class weights, the run's launch."""
