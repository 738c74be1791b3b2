package kms

import (
	"cmp"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"time"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/region"
)

// Config configures a regional KMS server. Zero values of optional fields
// mean the documented defaults.
type Config struct {
	// Region is the region this server serves; its bundles must name it, and
	// its identity (Source) is a KMS of it (kms/<region>/<name>).
	Region string
	// StateDir holds the last applied signed bundle (bundle.pb, mode 0600).
	// It holds only wrapped material.
	StateDir string
	// Source is the server's identity (mTLS).
	Source *identity.Source
	// RegionKeys fetches the region's master key versions (the root KMS in
	// production). It is called at boot and when a bundle needs a region key
	// version the server does not hold; never on the request path.
	RegionKeys RegionKeys
	// SigningKeys are the pinned bundle-signing public keys at start; with
	// Admins, replaceable while serving (Server.SetTrust).
	SigningKeys []ed25519.PublicKey
	// Admins may call KMSAdmin (default: regionctl/*/* of the server's trust
	// domain); replaceable while serving (Server.SetTrust).
	Admins identity.Allowlist
	// SerialFloor tells the region's bundle serial floor from the record
	// (the root KMS: RootKMSRegionKeys implements it). The server asks it
	// once, before it applies a bundle, and refuses a bundle below it; with
	// no bundle of its own it refuses every bundle until it can ask. nil:
	// the server knows only its own floor (the bundle it served last), so a
	// server with a fresh state directory accepts any valid bundle; only
	// for tests and tools that serve a fixed bundle.
	SerialFloor SerialFloor
	// Audit receives a record for every call (fail closed).
	Audit *audit.Log
	// Logger receives operational logs (nil: discard).
	Logger *slog.Logger
	// Reflection serves gRPC server reflection, so grpcurl can list and
	// describe the API (see grpcserver.Options.Reflection).
	Reflection bool
	// MaxBatch bounds the items of EncryptBatch and DecryptBatch, and the
	// probes of a Probe (0: 1000); a batch over it is refused before it is
	// decoded.
	MaxBatch int
	// MaxPayload bounds a plaintext and an associated data, and (plus the
	// AEAD's overhead) a ciphertext (0: 64 KiB).
	MaxPayload int
	// MaxRecvMsgSize bounds every request on the wire, including bundles and
	// batches (0: 64 MiB: MaxBatch DEK-sized items, or a bundle of about 100k
	// keysets). Larger requests fail with RESOURCE_EXHAUSTED.
	MaxRecvMsgSize int
	// MaxDataMsgSize bounds a data-plane request (kms.v1.KMS and
	// KMSAdmin.Probe, and the transit API's bodies) on the wire (0: 4 MiB:
	// a batch of MaxBatch DEK-sized items with room to spare). A larger one
	// is refused with RESOURCE_EXHAUSTED naming the limit (as gRPC refuses
	// a request over MaxRecvMsgSize) before it is decoded (a kms.v1.KMS
	// one before any handler, audit record or quota sees it); only
	// KMSAdmin's ApplyBundle (bundles) and GetStatus may send up to
	// MaxRecvMsgSize.
	// At most MaxRecvMsgSize (the default is too).
	MaxDataMsgSize int
	// MaxInFlight bounds the data-plane calls in progress on the server at
	// once, over all callers (0: DefaultInFlightPerCPU x GOMAXPROCS). The
	// data plane is CPU-bound: past a few dozen calls per core, more calls
	// in progress only queue and every call's latency grows; a call over
	// the cap is shed at once with RESOURCE_EXHAUSTED and a retry hint
	// instead, before its request is read.
	MaxInFlight int
	// DefaultQuota is the per-caller quota of callers no quota of the
	// served bundle matches, when the bundle sets no default_quota (nil:
	// MaxInFlight/2 calls in progress and no rate limit, so that no one
	// caller can take the whole server, while a storage frontend with one
	// identity and a few dozen concurrent unwraps is not refused by
	// default; a sensible rate depends on the
	// deployment, and the bundle says it). A zero field sets no limit of its
	// kind: &Quota{} sets none at all. See Quota.
	DefaultQuota *Quota
	// QuotaAuditWindow is how often the quota refusals are audited: one
	// record per caller refused in the window, with the counts (0: 10s).
	// Refusals are not audited call by call: a caller over its quota must
	// not flood the audit log.
	QuotaAuditWindow time.Duration
	// MaxCallDuration bounds every gRPC call the server serves, its
	// request's read included (0: grpcserver.DefaultMaxCallDuration, 30s):
	// a call whose client set no deadline, or a later one, is cut then
	// with DEADLINE_EXCEEDED (see grpcserver.Options.MaxCallDuration).
	MaxCallDuration time.Duration
	// FetchTimeout bounds one RegionKeys.Fetch (0: 10s).
	FetchTimeout time.Duration
	// RetryMin and RetryMax bound the jittered backoff between boot-time
	// region key fetches (0: 200ms and 5s).
	RetryMin, RetryMax time.Duration
	// Registry is a *prometheus.Registry that receives the server's metrics
	// (nil: a registry of its own; never the global one). Handler serves it.
	Registry *promRegistry
	// MetricsKeysetLimit bounds the keysets that get a series of their own in
	// cairn_kms_keyset_requests_total{keyset,op,outcome} (0: 100). Only
	// keysets named in the served bundle ever become labels, the first
	// MetricsKeysetLimit by name (a keyset keeps its label while it stays in
	// the bundles served; one dropped from the bundle loses its series and
	// frees its place). Calls on other keysets, on names the bundle does not
	// hold, and before a bundle is served count under keyset="_other". At
	// most MetricsKeysetLimit x 6 data-plane ops x 3 outcomes series, plus
	// _other's. Negative is an error.
	MetricsKeysetLimit int
	// Now is the clock of usage records and the Safety check (nil: time.Now).
	Now func() time.Time
	// UsageFlushInterval is how often the usage history (per key version:
	// counts and last use) is written to UsageFile in the state dir, so that
	// after a restart the Safety check still knows what was used within its
	// TTL (0: 10s; it is also written at Close). A crash loses at most this
	// much history, which the Safety check's TTLs (days) dwarf.
	UsageFlushInterval time.Duration
	// ShrinkGuard bounds how much a bundle may shrink against the one served
	// (zero fields: bundle.ShrinkGuard's defaults). A bundle past it is
	// refused unless it carries a signed shrink override
	// (regionctl bundle build --force-shrink --reason).
	ShrinkGuard bundle.ShrinkGuard
}

// Defaults.
const (
	DefaultMaxBatch       = 1000
	DefaultMaxPayload     = 64 << 10
	DefaultMaxRecvMsgSize = 64 << 20
	DefaultFetchTimeout   = 10 * time.Second
	DefaultRetryMin       = 200 * time.Millisecond
	DefaultRetryMax       = 5 * time.Second
	DefaultUsageFlush     = 10 * time.Second
	// DefaultMetricsKeysetLimit is MetricsKeysetLimit's default.
	DefaultMetricsKeysetLimit = 100
	// DefaultMaxDataMsgSize is MaxDataMsgSize's default.
	DefaultMaxDataMsgSize = 4 << 20
	// DefaultInFlightPerCPU times GOMAXPROCS is MaxInFlight's default.
	DefaultInFlightPerCPU = 64
	// DefaultQuotaAuditWindow is QuotaAuditWindow's default.
	DefaultQuotaAuditWindow = 10 * time.Second
)

// Validate reports a configuration that cannot work.
func (c Config) Validate() error {
	var errs []error
	if err := region.ValidName(c.Region); err != nil {
		errs = append(errs, fmt.Errorf("kms: region: %w", err))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("kms: no state directory"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("kms: no identity source"))
	} else if id := c.Source.ID(); id.Tier() != identity.TierKMS || id.Region() != c.Region {
		errs = append(errs, fmt.Errorf("kms: identity %s is not a KMS of region %q (want kms/%s/<name>)", id, c.Region, c.Region))
	}
	if c.RegionKeys == nil {
		errs = append(errs, errors.New("kms: no region key source"))
	}
	if len(c.SigningKeys) == 0 {
		errs = append(errs, errors.New("kms: no pinned bundle-signing keys"))
	}
	for i, k := range c.SigningKeys {
		if len(k) != ed25519.PublicKeySize {
			errs = append(errs, fmt.Errorf("kms: signing key %d is %d bytes, want %d", i, len(k), ed25519.PublicKeySize))
		}
	}
	if c.Audit == nil {
		errs = append(errs, errors.New("kms: no audit log"))
	}
	if err := c.ShrinkGuard.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("kms: %w", err))
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"MaxBatch", int64(c.MaxBatch)}, {"MaxPayload", int64(c.MaxPayload)}, {"MaxRecvMsgSize", int64(c.MaxRecvMsgSize)},
		{"FetchTimeout", int64(c.FetchTimeout)}, {"RetryMin", int64(c.RetryMin)}, {"RetryMax", int64(c.RetryMax)},
		{"UsageFlushInterval", int64(c.UsageFlushInterval)}, {"MetricsKeysetLimit", int64(c.MetricsKeysetLimit)},
		{"MaxDataMsgSize", int64(c.MaxDataMsgSize)}, {"MaxInFlight", int64(c.MaxInFlight)}, {"QuotaAuditWindow", int64(c.QuotaAuditWindow)},
		{"MaxCallDuration", int64(c.MaxCallDuration)}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("kms: negative %s", f.name))
		}
	}
	if recv := cmp.Or(c.MaxRecvMsgSize, DefaultMaxRecvMsgSize); c.MaxDataMsgSize > recv {
		errs = append(errs, fmt.Errorf("kms: MaxDataMsgSize %d is more than MaxRecvMsgSize %d", c.MaxDataMsgSize, recv))
	}
	if c.DefaultQuota != nil {
		if err := c.DefaultQuota.validate(); err != nil {
			errs = append(errs, fmt.Errorf("kms: DefaultQuota: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (c *Config) setDefaults() error {
	if len(c.Admins.Patterns()) == 0 {
		a, err := identity.ParseAllowlist(c.Source.TrustDomain(), "regionctl/*/*")
		if err != nil {
			return err
		}
		c.Admins = a
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&c.MaxBatch, DefaultMaxBatch)
	def(&c.MaxPayload, DefaultMaxPayload)
	def(&c.MaxRecvMsgSize, DefaultMaxRecvMsgSize)
	def(&c.MetricsKeysetLimit, DefaultMetricsKeysetLimit)
	def(&c.MaxDataMsgSize, min(DefaultMaxDataMsgSize, c.MaxRecvMsgSize))
	def(&c.MaxInFlight, DefaultInFlightPerCPU*runtime.GOMAXPROCS(0))
	if c.DefaultQuota == nil {
		c.DefaultQuota = &Quota{MaxConcurrent: uint32(max(1, c.MaxInFlight/2))}
	}
	defd := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	defd(&c.FetchTimeout, DefaultFetchTimeout)
	defd(&c.UsageFlushInterval, DefaultUsageFlush)
	defd(&c.QuotaAuditWindow, DefaultQuotaAuditWindow)
	defd(&c.RetryMin, DefaultRetryMin)
	defd(&c.RetryMax, DefaultRetryMax)
	c.RetryMax = max(c.RetryMax, c.RetryMin)
	if c.Now == nil {
		c.Now = time.Now
	}
	return nil
}
