/*
 * ppml: a Parquet KmsClient that hands out keys the Spark driver has already released.
 *
 * The driver (attested, under a TEE) unwraps each encrypted Parquet file's key-encryption key
 * through the ppml KMS and passes exactly those keys to the scan in the key access token
 * ("parquet.encryption.key.access.token"), which Spark ships to the executors inside the scan's
 * Hadoop configuration over its authenticated, encrypted channels. This client never talks to a
 * KMS and never wraps: writes go through ppml's own writer, which asks the KMS for fresh keys.
 *
 * Token: "ppml-released-v1:" + base64url(lines), one line per key,
 *   base64url(masterKeyIdentifier) '\t' base64url(wrappedKey) '\t' base64url(keyBytes)
 */
package org.ppml.spark;

import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.HashMap;
import java.util.Map;
import org.apache.hadoop.conf.Configuration;
import org.apache.parquet.crypto.KeyAccessDeniedException;
import org.apache.parquet.crypto.keytools.KmsClient;

public final class ReleasedKeyKmsClient implements KmsClient {
  static final String TOKEN_PREFIX = "ppml-released-v1:";

  private Map<String, byte[]> keys = Map.of();

  @Override
  public void initialize(
      Configuration configuration, String kmsInstanceID, String kmsInstanceURL, String accessToken)
      throws KeyAccessDeniedException {
    if (accessToken == null || !accessToken.startsWith(TOKEN_PREFIX)) {
      // Never echo the token: it carries key material.
      throw new KeyAccessDeniedException("ppml: no released keys were given to this scan");
    }
    Base64.Decoder decoder = Base64.getUrlDecoder();
    Map<String, byte[]> parsed = new HashMap<>();
    try {
      String body =
          new String(
              decoder.decode(accessToken.substring(TOKEN_PREFIX.length())),
              StandardCharsets.UTF_8);
      for (String line : body.split("\n", -1)) {
        if (line.isEmpty()) {
          continue;
        }
        String[] fields = line.split("\t", -1);
        if (fields.length != 3) {
          throw new IllegalArgumentException("bad line");
        }
        String master = new String(decoder.decode(fields[0]), StandardCharsets.UTF_8);
        String wrapped = new String(decoder.decode(fields[1]), StandardCharsets.UTF_8);
        parsed.put(entry(master, wrapped), decoder.decode(fields[2]));
      }
    } catch (IllegalArgumentException e) {
      throw new KeyAccessDeniedException("ppml: the released key list is malformed");
    }
    keys = Map.copyOf(parsed);
  }

  @Override
  public String wrapKey(byte[] keyBytes, String masterKeyIdentifier)
      throws KeyAccessDeniedException {
    throw new KeyAccessDeniedException(
        "ppml: this client only reads; write encrypted Parquet with PPMLContext.write");
  }

  @Override
  public byte[] unwrapKey(String wrappedKey, String masterKeyIdentifier)
      throws KeyAccessDeniedException {
    byte[] key = keys.get(entry(masterKeyIdentifier, wrappedKey));
    if (key == null) {
      throw new KeyAccessDeniedException(
          "ppml: no key was released for this file under master key " + masterKeyIdentifier);
    }
    return key.clone();
  }

  private static String entry(String master, String wrapped) {
    return master + '\u0000' + wrapped;
  }
}
