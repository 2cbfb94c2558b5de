"""Creating a family: keys made on the phone, only public parts registered."""

from __future__ import annotations

from client.keystore import FamilyBundle
from client.rpc import PrivfaceClient
from common import aspe, labels, photo_crypto


def create_family(client: PrivfaceClient, capacity: int = labels.DEFAULT_CAPACITY
                  ) -> FamilyBundle:
    """Generates the label key and master key, registers the family, returns the bundle."""
    label_key = aspe.generate_key(labels.label_dim(capacity))
    credentials = client.register_family(label_key.fingerprint(), label_key.cipher_dim)
    return FamilyBundle(family_id=credentials.family_id, server=client.address,
                        access_token=credentials.access_token, capacity=capacity,
                        label_key=label_key, master_key=photo_crypto.new_master_key())
