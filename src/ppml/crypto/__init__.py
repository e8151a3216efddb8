"""The crypto layer: the streaming AEAD file format, envelope encryption, passphrase sealing.

Every primitive comes from pyca/cryptography; this layer only composes them.
"""
