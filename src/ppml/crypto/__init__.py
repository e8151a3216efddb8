"""The crypto layer: the streaming AEAD file format, envelope encryption, passphrase sealing,
and HPKE sealing of released data keys.

Every primitive comes from pyca/cryptography; this layer only composes them.
"""
