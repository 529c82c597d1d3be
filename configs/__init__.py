"""Training configs: one file per experiment (`get_config()` returns a ConfigDict).

Each file's docstring holds the command that runs it. They all start from
`train.config_schema.base_config` (every key, documented beside its default); the released
presets' pod files share `configs.common.pretrain_config`.
"""
