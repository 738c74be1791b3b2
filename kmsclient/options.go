package kmsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"

	"github.com/cairnkms/cairn/internal/identity"
)

// Defaults of the options.
const (
	// DefaultTimeout is WithTimeout's default.
	DefaultTimeout = 10 * time.Second
	// DefaultAttemptTimeout is WithAttemptTimeout's default.
	DefaultAttemptTimeout = 2 * time.Second
	// DefaultMaxAttempts, DefaultInitialBackoff and DefaultMaxBackoff are
	// RetryPolicy's defaults.
	DefaultMaxAttempts    = 5
	DefaultInitialBackoff = 50 * time.Millisecond
	DefaultMaxBackoff     = time.Second
	// DefaultMaxPayload is WithMaxPayload's default: 1 MiB, far above what a
	// KMS accepts by default (64 KiB; a DEK is under 100 bytes) and far
	// below gRPC's 64 MiB message limit on the server.
	DefaultMaxPayload = 1 << 20
)

// ciphertextOverhead is what a ciphertext may add to its plaintext: a Tink
// prefix, a nonce and a tag, generously.
const ciphertextOverhead = 1024

// Option configures New.
type Option func(*options)

// options is what the Options set; New validates it as a whole.
type options struct {
	regions   []string            // in the order first named
	endpoints map[string][]string // region -> host:port, in failover order
	fallbacks map[string][]string // region -> decrypt fallback regions, in order

	// Exactly one identity route.
	identities []string // the names of the identity options given
	files      struct{ cert, key, bundle string }
	source     *identity.Source
	tlsConfig  *tls.Config

	timeout        time.Duration
	attemptTimeout time.Duration
	listedOrder    bool
	maxPayload     int
	retry          RetryPolicy
	logger         *slog.Logger

	errs []error // errors found while applying options

	// Test hooks (export_test.go).
	dialOptions []grpc.DialOption
	// dialer replaces the TCP dial (WithContextDialer).
	dialer func(ctx context.Context, addr string) (net.Conn, error)
	sleep  func(ctx context.Context, d time.Duration) error
}

// RetryPolicy says how often and how patiently one call retries. Zero fields
// take the defaults (5 attempts, 50ms, 1s).
//
// Only Unavailable, ResourceExhausted and DeadlineExceeded are retried, and
// DeadlineExceeded only when it is an attempt's deadline (WithAttemptTimeout)
// that passed, not the caller's or the call's. A retry goes to the region's
// next endpoint at once; only after every endpoint of the region (and of its
// decrypt fallbacks) failed in one round does the call back off, for a time
// drawn uniformly from [0, min(MaxBackoff, InitialBackoff·2^round)) ("full
// jitter").
type RetryPolicy struct {
	// MaxAttempts bounds the attempts one call makes in one region, counting
	// the first (1: no retries). Each decrypt fallback region has a budget
	// of its own.
	MaxAttempts int
	// InitialBackoff is the backoff ceiling after the first failed round.
	InitialBackoff time.Duration
	// MaxBackoff caps the ceiling, which doubles every round.
	MaxBackoff time.Duration
}

// WithEndpoints adds the KMS servers of a region, as host:port, in the order
// the client tries them. It may be given for several regions; given twice for
// one region, the addresses are appended. A region's servers must present
// the SPIFFE ID kms/<region>/<name> of the client's trust domain.
func WithEndpoints(region string, addrs ...string) Option {
	return func(o *options) {
		if err := validRegion(region); err != nil {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithEndpoints: %v", err))
			return
		}
		if len(addrs) == 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithEndpoints(%q): no addresses", region))
			return
		}
		for _, a := range addrs {
			host, port, err := net.SplitHostPort(a)
			if err != nil || host == "" || port == "" {
				o.errs = append(o.errs, fmt.Errorf("kmsclient: WithEndpoints(%q): address %q is not host:port", region, truncate(a)))
				return
			}
		}
		if o.endpoints == nil {
			o.endpoints = map[string][]string{}
		}
		if _, ok := o.endpoints[region]; !ok {
			o.regions = append(o.regions, region)
		}
		o.endpoints[region] = append(o.endpoints[region], addrs...)
	}
}

// WithIdentityFiles makes the client present the X.509-SVID in certFile and
// keyFile (PEM; the key file must have mode 0600) and trust the CA bundle in
// bundleFile, as `cairn dev certs` writes them (<dir>/ca.pem and
// <dir>/<tier>/<region>/<name>/{cert.pem,key.pem}). The trust domain is the
// certificate's. New loads and checks the files; they are reloaded when they
// change (checked at most every identity.DefaultCheckInterval, on new
// connections), so a rotated certificate needs no restart.
func WithIdentityFiles(certFile, keyFile, bundleFile string) Option {
	return func(o *options) {
		o.identities = append(o.identities, "WithIdentityFiles")
		o.files.cert, o.files.key, o.files.bundle = certFile, keyFile, bundleFile
	}
}

// WithSource makes the client use a loaded identity.Source: the route for
// code inside the Cairn module (commands, tests) that already holds one.
func WithSource(src *identity.Source) Option {
	return func(o *options) {
		o.identities = append(o.identities, "WithSource")
		if src == nil {
			o.errs = append(o.errs, errors.New("kmsclient: WithSource(nil)"))
		}
		o.source = src
	}
}

// WithTLSConfig makes the client use cfg for its connections: for callers
// whose certificates come from elsewhere (a SPIFFE Workload API source,
// go-spiffe's tlsconfig, an HSM-backed signer). cfg must present the
// client's X.509-SVID (Certificates[0] or GetClientCertificate; the trust
// domain is taken from it) and must authenticate the server's certificate
// chain itself: either by standard verification (InsecureSkipVerify false,
// RootCAs) or, as go-spiffe's tlsconfig.MTLSClientConfig does, in
// VerifyPeerCertificate. A config that verifies nothing is refused. On top
// of what cfg checks, the client adds a VerifyConnection check, per region,
// that the server's leaf certificate carries the SPIFFE ID kms/<region>/*
// of the client's trust domain, and pins TLS 1.3. cfg is cloned; later
// changes to it are not seen.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *options) {
		o.identities = append(o.identities, "WithTLSConfig")
		if cfg == nil {
			o.errs = append(o.errs, errors.New("kmsclient: WithTLSConfig(nil)"))
			return
		}
		o.tlsConfig = cfg.Clone()
	}
}

// WithMaxPayload bounds, on the client, a plaintext and an associated data
// (and, plus a small overhead, a ciphertext) before anything is sent
// (default DefaultMaxPayload). A larger input fails at once with
// InvalidArgument instead of crossing the network to be refused, or, past the
// server's message limit, refused as ResourceExhausted, which the client
// would take for overload and retry.
func WithMaxPayload(n int) Option {
	return func(o *options) {
		if n <= 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithMaxPayload(%d): want a positive size", n))
			return
		}
		o.maxPayload = n
	}
}

// WithContextDialer makes the client's connections with dial instead of a
// TCP dial of each endpoint's address: through a proxy, from another network
// namespace, over a Unix socket. dial gets the address exactly as given to
// WithEndpoints (gRPC resolves nothing itself then); mTLS runs over the
// connection it returns, as over TCP, so the server's identity is checked
// all the same.
func WithContextDialer(dial func(ctx context.Context, addr string) (net.Conn, error)) Option {
	return func(o *options) {
		if dial == nil {
			o.errs = append(o.errs, errors.New("kmsclient: WithContextDialer(nil)"))
			return
		}
		o.dialer = dial
	}
}

// WithListedOrder makes every region's first call go to its first listed
// endpoint (a list ordered by preference, nearest first). By default a
// client starts at a random endpoint of each region, so that a fleet of
// clients configured alike spreads over the region's servers. Either way
// the endpoint in use is sticky until it fails.
func WithListedOrder() Option {
	return func(o *options) { o.listedOrder = true }
}

// WithTimeout sets the deadline of one Encrypt or Decrypt, all attempts,
// backoffs and fallbacks included (default 10s). It applies when the
// caller's context has no earlier deadline.
func WithTimeout(d time.Duration) Option {
	return func(o *options) {
		if d < 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithTimeout(%v): negative", d))
			return
		}
		o.timeout = d
	}
}

// WithAttemptTimeout bounds one attempt on one endpoint (default 2s), so
// that a hung endpoint is left for the next one. The call's deadline caps it.
func WithAttemptTimeout(d time.Duration) Option {
	return func(o *options) {
		if d < 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithAttemptTimeout(%v): negative", d))
			return
		}
		o.attemptTimeout = d
	}
}

// WithRetry sets the retry policy (zero fields: the defaults).
func WithRetry(p RetryPolicy) Option {
	return func(o *options) {
		if p.MaxAttempts < 0 || p.InitialBackoff < 0 || p.MaxBackoff < 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithRetry(%+v): negative field", p))
			return
		}
		o.retry = p
	}
}

// WithDecryptFallback lets Decrypt of a keyset in region, when every endpoint
// of region failed with a retryable error, try the keyset of the same name in
// the fallback regions, in order. Keysets made for several regions are one
// Tink keyset stored under each region's key, so any of those regions
// decrypts the ciphertexts of the others. Encrypt never falls back: a
// ciphertext is always made by its own region. Every region named needs
// endpoints. Given twice for one region, the fallbacks are appended.
func WithDecryptFallback(region string, fallbacks ...string) Option {
	return func(o *options) {
		if err := validRegion(region); err != nil {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithDecryptFallback: %v", err))
			return
		}
		if len(fallbacks) == 0 {
			o.errs = append(o.errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): no fallback regions", region))
			return
		}
		if o.fallbacks == nil {
			o.fallbacks = map[string][]string{}
		}
		o.fallbacks[region] = append(o.fallbacks[region], fallbacks...)
	}
}

// WithLogger makes the client log to l (nil: discard): failovers and decrypt
// fallbacks as warnings (at most one per endpoint or region every 10s, the
// rest at debug level), and failed attempts at debug level. It never logs
// plaintexts, keys or ciphertexts.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// validate checks the options as a whole and fills in the defaults.
func (o *options) validate() error {
	errs := append([]error(nil), o.errs...)
	if len(o.endpoints) == 0 && len(o.errs) == 0 {
		errs = append(errs, errors.New("kmsclient: no endpoints; give WithEndpoints(region, host:port...) for each region used"))
	}
	// A KMS server serves one region, so an address can authenticate for one
	// region only; a repeated address is a configuration mistake.
	seen := map[string]string{}
	for _, r := range o.regions {
		for _, a := range o.endpoints[r] {
			if prev, ok := seen[a]; ok {
				errs = append(errs, fmt.Errorf("kmsclient: endpoint %s is given for region %s and again for region %s", a, prev, r))
				continue
			}
			seen[a] = r
		}
	}
	for r, fbs := range o.fallbacks {
		if _, ok := o.endpoints[r]; !ok {
			errs = append(errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): region %s has no endpoints", r, r))
		}
		dup := map[string]bool{}
		for _, f := range fbs {
			switch {
			case validRegion(f) != nil:
				errs = append(errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): %v", r, validRegion(f)))
			case f == r:
				errs = append(errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): a region cannot be its own fallback", r))
			case dup[f]:
				errs = append(errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): fallback region %s given twice", r, f))
			case o.endpoints[f] == nil:
				errs = append(errs, fmt.Errorf("kmsclient: WithDecryptFallback(%q): fallback region %s has no endpoints", r, f))
			}
			dup[f] = true
		}
	}
	switch len(o.identities) {
	case 0:
		errs = append(errs, errors.New("kmsclient: no identity; give WithIdentityFiles(cert, key, bundle) (or WithTLSConfig)"))
	case 1:
	default:
		errs = append(errs, fmt.Errorf("kmsclient: more than one identity option (%v); give exactly one", o.identities))
	}
	if o.retry.MaxBackoff != 0 && o.retry.InitialBackoff > o.retry.MaxBackoff {
		errs = append(errs, fmt.Errorf("kmsclient: WithRetry: InitialBackoff %v is more than MaxBackoff %v", o.retry.InitialBackoff, o.retry.MaxBackoff))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if o.timeout == 0 {
		o.timeout = DefaultTimeout
	}
	if o.attemptTimeout == 0 {
		o.attemptTimeout = DefaultAttemptTimeout
	}
	if o.maxPayload == 0 {
		o.maxPayload = DefaultMaxPayload
	}
	if o.retry.MaxAttempts == 0 {
		o.retry.MaxAttempts = DefaultMaxAttempts
	}
	if o.retry.InitialBackoff == 0 {
		o.retry.InitialBackoff = DefaultInitialBackoff
		if o.retry.MaxBackoff != 0 {
			o.retry.InitialBackoff = min(DefaultInitialBackoff, o.retry.MaxBackoff)
		}
	}
	if o.retry.MaxBackoff == 0 {
		o.retry.MaxBackoff = max(DefaultMaxBackoff, o.retry.InitialBackoff)
	}
	if o.logger == nil {
		o.logger = slog.New(slog.DiscardHandler)
	}
	return nil
}
