// Package kmsclient is the Tink client of Cairn's regional KMS: a
// registry.KMSClient whose AEADs (tink.AEAD and tink.AEADWithContext) wrap
// and unwrap data keys by calling the KMS servers of a region over mTLS.
//
// # Key URIs
//
// A key URI names one keyset of one region:
//
//	cairn-kms://<region>/<keyset>      e.g. cairn-kms://us-east/payments/ledger
//
// The region is the first path segment; the keyset name is the rest and may
// contain '/'. ParseKeyURI and KeyURI convert; Supported accepts exactly the
// well-formed URIs of regions given to WithEndpoints. The URI names no
// server: where a region's KMS servers are is the client's configuration.
//
// # Use with Tink
//
// The usual pattern is envelope encryption: Tink makes a fresh data key (DEK)
// per object, encrypts the object locally, and has the KMS wrap the DEK:
//
//	kek, err := client.AEAD("us-east", "payments/ledger")
//	env, err := aead.NewKMSEnvelopeAEADWithContext(aead.AES256GCMKeyTemplate(), kek)
//	ct, err := env.EncryptWithContext(ctx, object, objectID)
//
// aead.NewKMSEnvelopeAEAD2 works the same without contexts, and so does the
// registry route (registry.RegisterKMSClient, then a keyset made from
// aead.CreateKMSEnvelopeAEADKeyTemplate(uri, dek) and aead.New). Where one
// KMS call per object costs too much, keep a Tink keyset encrypted under the
// KMS (keyset.WriteWithContext / keyset.ReadWithContext with the AEAD as
// key-encryption AEAD), unwrap it once, and encrypt locally.
//
// NewEnvelopeAEAD is the same envelope encryption with far fewer allocations
// per object: it writes and reads exactly the ciphertexts of Tink's envelope
// AEADs (either decrypts the other's objects), takes a direct path for
// AES128_GCM and AES256_GCM DEKs (no key manager, proto or keyset handle per
// object) and leaves the other DEK templates to Tink's envelope:
//
//	env, err := kmsclient.NewEnvelopeAEAD(aead.AES256GCMKeyTemplate(), kek)
//
// # Batches and data keys
//
// AEAD.EncryptBatch and AEAD.DecryptBatch send many items (DEKs, usually)
// in one call and return one result per item, each with its own error; a
// KMS accepts up to DefaultServerMaxBatch items unless configured otherwise
// and refuses a larger batch as a whole (InvalidArgument naming its limit).
// A batch is retried, as a whole, only when no answer came; an answered
// batch is final. AEAD.GenerateDataKey has the KMS make a fresh data key
// and return it in plaintext and wrapped (a DataKey, which never prints its
// plaintext; Wipe it after use).
//
// Associated data: the AEAD sends its associated data to the KMS, which binds
// it to the ciphertext. Tink's envelope AEAD, however, calls its
// key-encryption AEAD with empty associated data and uses the caller's
// associated data only for the payload, by design in every Tink language: a
// wrapped DEK is not bound to the object it protects and can be unwrapped on
// its own by anyone the keyset's ACL allows to decrypt. keyset.Write and
// keyset.Read with associated data do pass it to the KMS.
//
// # Failover and retries
//
// Each region has a list of endpoints (WithEndpoints). Calls go to the
// endpoint in use (at first a random one, so that clients configured alike
// spread over the region's servers; the first listed with WithListedOrder);
// a retryable failure there moves
// the region to the next one, for this call and the following ones (sticky
// failover), without a pause. Only when every endpoint of the region (and,
// for a decrypt, of its fallback regions) failed in one round does the call
// back off, with full jitter (RetryPolicy), before the next round; a
// server's retry hint (a google.rpc.RetryInfo detail, which a KMS over its
// caller's quota or shedding load sends with RESOURCE_EXHAUSTED) is the
// pause's floor (at most 30s), and a hint past the call's deadline ends the
// call at once with that RESOURCE_EXHAUSTED. Retryable
// are Unavailable (the server is down, not ready, or failed the handshake),
// ResourceExhausted (overload; an input too large for any server is refused
// by the client first, see WithMaxPayload), and DeadlineExceeded of one attempt (WithAttemptTimeout
// leaves a hung endpoint for the next); everything else (InvalidArgument for
// a ciphertext that does not decrypt, NotFound, PermissionDenied,
// FailedPrecondition, ...) is returned at once. When the attempts run out the
// error names the region, the keyset, how many endpoints were tried and the
// last failure, and wraps that failure's gRPC status, so status.Code works
// on it as on the errors returned at once (ErrClosed, after Close, is the
// exception).
//
// Batches and GenerateDataKey follow the same rules, with one difference for
// batches: only a batch that brought no answer is retried, and a
// ResourceExhausted is retried only with the KMS's retry hint (without one
// it is a gRPC message-size limit, which the same batch would hit again).
//
// WithDecryptFallback lets a decrypt whose region has failed go on in other
// regions that hold the same keyset. Encrypt never falls back. A fallback
// region's refusal (PermissionDenied: the keyset is not deployed there, or
// this client may not use it there, which a KMS does not tell apart;
// InvalidArgument: the version, or the associated data, does not match
// there) is no verdict on the ciphertext: the next
// fallback is tried, and if none succeeds the call fails with the primary
// region's outage (Unavailable or DeadlineExceeded), its message listing what
// each fallback said.
//
// # Deadlines
//
// One Encrypt or Decrypt, all attempts, pauses and fallbacks included, ends
// by the caller's context deadline or WithTimeout, whichever is earlier; each
// attempt is bounded by WithAttemptTimeout within that, and, while another
// endpoint is left to try, by half the time left, so that a hung server
// cannot take a short call's whole deadline and never be failed over. A caller's
// cancellation stops the call at once (the error reports codes.Canceled and
// errors.Is(err, context.Canceled)). Encrypt and Decrypt without a context
// are bounded by WithTimeout alone.
//
// # Identity
//
// The client authenticates with an X.509-SVID (WithIdentityFiles, reloaded
// when the files change; WithSource inside the Cairn module; or
// WithTLSConfig) and accepts, for region R, only servers presenting the
// SPIFFE ID kms/R/<name> of its own trust domain: a KMS of another region
// answering at a region's address fails the handshake (Unavailable) and is
// never sent a request. The KMS decides, per keyset, what the client's
// identity may do (PermissionDenied otherwise).
//
// The client never logs plaintexts, keys or ciphertexts, and its errors
// never contain them.
package kmsclient
