"""The job's stages, one module each, named as the stage; each exposes run(cfg)."""
