// Package distributor is the root-key distributor: a server that holds the
// root master key (RMK) in one locked memory region and nowhere else, and
// hands it, HPKE-sealed to an ephemeral key, to authenticated root KMS
// replicas and peer distributors.
//
// A distributor starts sealed. It becomes unsealed by
//   - fetching the RMK from a configured peer (checked against the pinned
//     KCV, so a lying or stale peer cannot plant a key),
//   - an unseal ceremony: K security officers release their Shamir shares,
//     each checked against the manifest before the key is rebuilt and
//     checked against the KCV, or
//   - a provisioning ceremony, in which genesis hands over a new RMK.
//
// Losing every distributor is survivable only through a ceremony: that is
// the point.
//
// An emergency seal (Seal with emergency set; `safe seal --fleet`) drops the
// key and stops the peer loop: the distributor asks no peer for the key and
// installs none fetched in flight, so a sealed fleet stays sealed; only an
// unseal ceremony (K officers; not a provisioning) lifts it. The state is in
// RAM only, like the key: a restarted distributor forgets it and fetches
// from its peers, which hand out nothing while they are emergency-sealed,
// and serve it again once one is unsealed by a ceremony.
//
// A rekey ceremony re-splits the key: K officers release their current
// shares into it exactly as into an unseal ceremony; the distributor rebuilds
// the key, checks it against the manifest's commitments and KCV, splits it
// for the ceremony's plan (new K, new safes) and seals each new share to the
// HPKE key of the process that seals it into its new safe (`safe rekey`),
// writing a distributor/rekey audit record before releasing them. The new
// manifest is then pinned on every distributor with InstallManifest (the
// next epoch, linked by hash to the pinned one; audited), and only then are
// the old shares destroyed.
package distributor

import (
	"errors"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
)

// Config configures a distributor.
type Config struct {
	// ManifestPath is the pinned genesis manifest (public). If it does not
	// exist the distributor is unprovisioned: it waits for a provisioning
	// ceremony, which writes it. A manifest rewritten by a rekey (same
	// genesis id and KCV, higher epoch) is picked up by the next ceremony.
	ManifestPath string
	// Source is the distributor's own identity, for serving and for dialing
	// peers.
	Source *identity.Source
	// Officers may open, cancel and contribute to ceremonies, Seal, and
	// install a rekeyed manifest.
	Officers identity.Allowlist
	// RootKeyReaders may fetch the RMK: root KMS replicas.
	RootKeyReaders identity.Allowlist
	// Peers may fetch the RMK to unseal themselves: other distributors. A
	// peer this distributor dials must also match.
	Peers identity.Allowlist
	// PeerAddrs are the host:port addresses of peers to fetch the RMK from
	// while sealed.
	PeerAddrs []string
	// Audit receives a record for every call and every unseal.
	Audit *audit.Log
	// Logger receives operational logs (nil: discard).
	Logger *slog.Logger
	// Registry receives the server's Prometheus metrics (nil: a registry
	// of its own that nothing serves).
	Registry *prometheus.Registry
	// Reflection serves gRPC server reflection, so grpcurl can list and
	// describe the API (see grpcserver.Options.Reflection).
	Reflection bool
	// CeremonyTTL is how long a ceremony accepts shares unless its opener
	// asks for less (0: 30 minutes). MaxCeremonyTTL caps requests (0: 24h).
	CeremonyTTL, MaxCeremonyTTL time.Duration
	// PeerRetryMin and PeerRetryMax bound the jittered backoff between peer
	// fetch rounds while sealed (0: 200ms and 5s). PeerPollInterval is how
	// often peers' status is refreshed while unsealed (0: 10s).
	PeerRetryMin, PeerRetryMax, PeerPollInterval time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Validate reports a configuration that cannot work.
func (c Config) Validate() error {
	var errs []error
	if c.ManifestPath == "" {
		errs = append(errs, errors.New("distributor: no manifest path"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("distributor: no identity source"))
	}
	if c.Audit == nil {
		errs = append(errs, errors.New("distributor: no audit log"))
	}
	if len(c.Officers.Patterns()) == 0 {
		errs = append(errs, errors.New("distributor: no officers: nobody could run a ceremony"))
	}
	if len(c.PeerAddrs) > 0 && len(c.Peers.Patterns()) == 0 {
		errs = append(errs, errors.New("distributor: peer addresses given but no peer identities allowed"))
	}
	return errors.Join(errs...)
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.CeremonyTTL == 0 {
		c.CeremonyTTL = 30 * time.Minute
	}
	if c.MaxCeremonyTTL == 0 {
		c.MaxCeremonyTTL = 24 * time.Hour
	}
	if c.PeerRetryMin == 0 {
		c.PeerRetryMin = 200 * time.Millisecond
	}
	if c.PeerRetryMax == 0 {
		c.PeerRetryMax = 5 * time.Second
	}
	if c.PeerPollInterval == 0 {
		c.PeerPollInterval = 10 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}
