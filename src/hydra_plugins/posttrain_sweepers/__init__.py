"""posttrain's Hydra plugins (Hydra loads plugin classes only from `hydra_plugins.*`)."""
