// Package transit serves the part of HashiCorp Vault's transit secrets
// engine HTTP API that storage systems call (Vault and OpenBao clients,
// tink-go-hcvault, database and object-store KMS plugins): encrypt,
// decrypt, rewrap, datakey, the key read and sys/health. It is an adapter
// and nothing more: it holds no key and does no cryptography. Every call
// becomes a kms.v1 request to a Backend, which runs it through the regional
// KMS's own data plane, identities, ACLs and audit.
//
// The mapping rules (README.md, "Vault transit API", has the same):
//
//   - Ciphertexts are "vault:v<N>:<base64>": the base64 (standard, padded)
//     is exactly the Cairn ciphertext the gRPC API returns, and N is its key
//     version ID, the Tink key ID in its 5-byte prefix. A ciphertext whose N
//     is not its prefix's key ID is refused. FormatCiphertext and
//     ParseCiphertext convert between the two forms, losslessly.
//   - Versions are Cairn key IDs: random 32-bit numbers, not counters. Their
//     numeric order means nothing. latest_version is the primary's key ID,
//     and key_version on encrypt, rewrap and datakey may only be 0 (or
//     absent) or that ID: Cairn encrypts with the primary only.
//   - Keyset names may hold '/': everything after the operation's path
//     segment is the name, so /v1/transit/encrypt/payments/ledger names
//     payments/ledger, and so does payments%2Fledger. A name that still holds
//     '%' after the URL's own decoding is percent-decoded once more: that is
//     what tink-go-hcvault sends for hcvault://host/transit/keys/payments%2Fledger
//     (it takes the last path segment as the name, so a '/' in it must be
//     written %2F, which the Vault client escapes again).
//   - associated_data and the legacy context field (both base64) are the
//     same thing, Cairn's associated data: send either; if both are sent
//     they must be equal. Cairn has no key derivation, so context derives
//     nothing; it is bound to the ciphertext like associated_data.
//   - X-Vault-Token is not an identity (the mTLS client certificate is): it
//     is ignored, and never logged or audited. Response wrapping
//     (X-Vault-Wrap-TTL) and namespaces (X-Vault-Namespace) would change the
//     answer: they are refused.
//   - Errors are Vault's {"errors":[...]} with an HTTP status from one table
//     (HTTPStatus). A batch reports per-item errors in batch_results the way
//     Vault does.
package transit

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"github.com/tink-crypto/tink-go/v2/key"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// Backend is what the API needs from the KMS. Each method runs one call
// through the KMS's data plane as its gRPC twin does: the caller's identity
// is taken from the Call in ctx (CallFrom: its TLS connection state), the
// call is audited and authorized, and the Call's request ID is set to the
// ID the call was audited under. Errors are gRPC status errors, whose codes
// HTTPStatus maps.
type Backend interface {
	// Encrypt, EncryptBatch, Rewrap and GenerateDataKey are kms.v1.KMS's.
	// version is the key_version the client asked for: 0 is the primary;
	// any other value is refused with InvalidArgument, before anything is
	// encrypted, unless it is the keyset's primary key ID.
	Encrypt(ctx context.Context, version uint32, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error)
	EncryptBatch(ctx context.Context, version uint32, req *kmsv1.EncryptBatchRequest) (*kmsv1.EncryptBatchResponse, error)
	Rewrap(ctx context.Context, version uint32, req *kmsv1.RewrapRequest) (*kmsv1.RewrapResponse, error)
	GenerateDataKey(ctx context.Context, version uint32, req *kmsv1.GenerateDataKeyRequest) (*kmsv1.GenerateDataKeyResponse, error)
	// Decrypt and DecryptBatch are kms.v1.KMS's.
	Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error)
	DecryptBatch(ctx context.Context, req *kmsv1.DecryptBatchRequest) (*kmsv1.DecryptBatchResponse, error)
	// ReadKey describes the named keyset to a caller on at least one of its
	// ACLs. Any other caller gets exactly the NotFound an unknown keyset
	// gets.
	ReadKey(ctx context.Context, name string) (*Key, error)
	// Ready reports whether the KMS serves calls: a bundle loaded, and
	// nothing (such as a broken audit log) refusing every call
	// (sys/health).
	Ready() bool
}

// Key describes a keyset for the key read.
type Key struct {
	Name string
	// Primary is the key ID new ciphertexts are made with.
	Primary uint32
	// Versions are the versions that decrypt, the primary among them.
	Versions []KeyVersion
}

// KeyVersion is one version of a Key.
type KeyVersion struct {
	// ID is the Tink key ID.
	ID uint32
	// Since is the earliest time Cairn's record knows of the version (when
	// it was first served everywhere, or else became primary); zero if the
	// bundle carries none.
	Since time.Time
	// Parameters are the key's Tink parameters (nil: unknown).
	Parameters key.Parameters
}

// Call is one HTTP request's state shared between the handler and the
// Backend: it is in the context of every Backend call (CallFrom). A Call is
// used by one goroutine at a time.
type Call struct {
	// TLS is the request's connection state (nil over plain HTTP). The
	// Backend takes the caller's identity from its verified peer
	// certificate.
	TLS *tls.ConnectionState

	requestID string
	audited   bool
}

// RequestID is the ID the request's calls are audited under: the client's
// X-Request-Id until a Backend call has set it, then the one the Backend
// set (later calls of the same request reuse it).
func (c *Call) RequestID() string { return c.requestID }

// SetRequestID records the ID a Backend call was audited under; the handler
// returns it in the X-Request-Id header of an error response.
func (c *Call) SetRequestID(id string) { c.requestID, c.audited = id, true }

type callKey struct{}

// CallFrom returns the Call of a Backend call's context (nil outside one).
func CallFrom(ctx context.Context) *Call {
	c, _ := ctx.Value(callKey{}).(*Call)
	return c
}

// WithCall returns a context carrying c, as the handler passes it to the
// Backend (for Backend tests).
func WithCall(ctx context.Context, c *Call) context.Context {
	return context.WithValue(ctx, callKey{}, c)
}

// Limits are the KMS limits requests must fit; they size the body limit.
type Limits struct {
	// MaxBatch is the most items in a batch call.
	MaxBatch int
	// MaxPayload is the largest plaintext or associated data, and
	// MaxCiphertext the largest ciphertext, in bytes.
	MaxPayload, MaxCiphertext int
	// MaxMessage is the largest request the gRPC API accepts (0: no cap).
	MaxMessage int
}

// Per-request and per-item allowances of BodyLimit for what is not payload:
// JSON field names, quotes, a "vault:v<N>:" prefix, key_version, a client's
// reference, whitespace.
const (
	fieldAllowance   = 64
	itemAllowance    = 1 << 10
	requestAllowance = 16 << 10
)

// BodyLimit returns the largest request body the API reads for a KMS with
// limits l: a batch of MaxBatch items, each with a ciphertext (or
// plaintext) and associated data given both as associated_data and context
// at their size limits, base64 in JSON, plus allowances for the rest. If
// l.MaxMessage is set the limit is capped at the base64 size of the largest
// gRPC request plus the same allowances: a transit request is never much
// larger than the largest gRPC one. It is never less than one item at the
// limits.
func BodyLimit(l Limits) int64 {
	b64 := func(n int) int64 { return int64(base64.StdEncoding.EncodedLen(max(n, 0))) }
	item := b64(max(l.MaxCiphertext, l.MaxPayload)) + 2*b64(l.MaxPayload) + 3*fieldAllowance + itemAllowance
	n := int64(max(l.MaxBatch, 1))*item + requestAllowance
	if l.MaxMessage > 0 {
		n = min(n, b64(l.MaxMessage)+int64(max(l.MaxBatch, 1))*itemAllowance+requestAllowance)
	}
	return max(n, item+requestAllowance)
}

// DefaultMount is Options.Mount's default.
const DefaultMount = "transit"

// RequestIDHeader is the HTTP header of a request's ID (audit.RequestIDHeader
// on gRPC).
const RequestIDHeader = "X-Request-Id"

// Options configures NewHandler.
type Options struct {
	// Mount is the mount path: the API is served under /v1/<Mount>/
	// (default "transit"). Segments of A-Z a-z 0-9 . _ - joined by '/'.
	Mount string
	// Limits size the request body limit (BodyLimit); MaxBatch is also the
	// most items a batch_input may hold. Required.
	Limits Limits
	// Version is what sys/health reports (default: "cairn" and the module
	// version of the build).
	Version string
	// Logger receives operational logs (nil: discard). It never receives a
	// payload, a key or a token.
	Logger *slog.Logger
	// Now is sys/health's clock (nil: time.Now).
	Now func() time.Time
}

// Validate reports options that cannot work.
func (o Options) Validate() error {
	var errs []error
	if o.Mount != "" {
		if err := validMount(o.Mount); err != nil {
			errs = append(errs, err)
		}
	}
	if o.Limits.MaxBatch <= 0 || o.Limits.MaxPayload <= 0 || o.Limits.MaxCiphertext <= 0 {
		errs = append(errs, errors.New("transit: Limits.MaxBatch, MaxPayload and MaxCiphertext must be positive"))
	}
	if o.Limits.MaxMessage < 0 {
		errs = append(errs, errors.New("transit: negative Limits.MaxMessage"))
	}
	return errors.Join(errs...)
}

func validMount(m string) error {
	for seg := range strings.SplitSeq(m, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.ContainsFunc(seg, func(r rune) bool {
			return !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '.' || r == '_' || r == '-')
		}) {
			return fmt.Errorf("transit: mount %q: use segments of A-Z a-z 0-9 . _ - joined by /, e.g. transit", m)
		}
	}
	return nil
}

func (o *Options) setDefaults() {
	if o.Mount == "" {
		o.Mount = DefaultMount
	}
	if o.Version == "" {
		o.Version = "cairn"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
			o.Version += " " + bi.Main.Version
		}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}
