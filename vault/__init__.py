"""The vault: the bottom layer of idvault.

SQL models, envelope encryption and the key store, the artifact codec, the
dedupe index, consent and the audit chain. It never imports torch, diffusers
or insightface, so the registry runs on machines without an ML stack.
"""
