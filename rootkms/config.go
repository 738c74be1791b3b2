// Package rootkms is the root KMS: the KMS for the KMS. A small hashicorp/raft
// cluster whose state is one master key per region (with versions), each
// version wrapped by the root master key (RMK); replicas fetch the RMK from
// distributors at boot and serve:
//
//   - regional KMS servers: UnwrapRegionKey, from any replica's local state,
//     only to KMS identities of that region, sealed to their ephemeral key;
//   - regionctl: regions (CreateRegion, RotateRegionKey,
//     RetireRegionKeyVersion) and the keyset record (CreateKeyset, GetKeyset,
//     ListKeysets, UpdateKeyset, SetKeysetPolicy, RecordPropagation): the
//     root KMS is the system of record for customer keysets, which are made
//     and re-encrypted inside it (plaintext keysets never leave), and it
//     checks every lifecycle step against the Safety Condition;
//   - operators: cluster status, join, remove, snapshot, backup export;
//   - security officers: emergency seal (DropRootKey), backup export and
//     restore (disaster recovery into a fresh cluster of the same RMK).
//
// Writes and the reads that gate decisions go through the leader, after a
// Raft barrier, so a deposed or partitioned leader can neither acknowledge a
// write nor answer from stale state.
package rootkms

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hashicorp/raft"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/internal/safety"
	safev1 "github.com/cairnkms/cairn/proto/cairn/safe/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
)

// Config configures a root KMS replica.
type Config struct {
	// ID is the replica's Raft server ID, e.g. "rootkms-1".
	ID string
	// DataDir holds the Raft log, stable store and snapshots (wrapped
	// material only).
	DataDir string
	// Bootstrap makes this replica the first voter of a new cluster when it
	// has no Raft state.
	Bootstrap bool
	// Join lists API addresses of existing replicas to ask to add this one
	// (as a voter, or a non-voter if NonVoter) when it has no Raft state.
	Join     []string
	NonVoter bool
	// APIAdvertise and RaftAdvertise are the addresses others reach this
	// replica at (default: the listeners' addresses).
	APIAdvertise, RaftAdvertise string
	// Manifest is the pinned genesis manifest: the RMK lineage (genesis id
	// and KCV) this cluster belongs to.
	Manifest *safev1.GenesisManifest
	// Distributors are host:port addresses of distributors to fetch the RMK
	// from.
	Distributors []string
	// Source is this replica's identity.
	Source *identity.Source
	// Regionctl may manage regions and keysets (default regionctl/*/*).
	//
	// Operators may join any server, rewrite a member's address, remove
	// members and snapshot (default operator/*/*). Replicas are not
	// operators: an Operators pattern that could match an ID Replicas
	// allows is a configuration error. A replica that is not an operator
	// may only join itself (see Server.Join).
	//
	// Replicas are the identities allowed on the Raft transport and as
	// members (default rootkms/*/*); DistributorIDs are the servers trusted
	// to hand out the RMK (default distributor/*/*); Officers may drop the
	// root key in an emergency seal (DropRootKey; default officer/*/*).
	// Operators and Officers may export backups of the state
	// (ExportBackup); only Officers may restore one (RestoreBackup).
	Regionctl, Operators, Replicas, DistributorIDs, Officers identity.Allowlist
	// Audit receives a record for every call.
	Audit *audit.Log
	// Logger receives operational logs (nil: discard).
	Logger *slog.Logger
	// Registry receives the server's Prometheus metrics (nil: a registry
	// of its own that nothing serves).
	Registry *prometheus.Registry
	// Reflection serves gRPC server reflection, so grpcurl can list and
	// describe the API (see grpcserver.Options.Reflection).
	Reflection bool
	// Raft timing (0: raft defaults: 1s, 1s, 500ms).
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// ApplyTimeout bounds a Raft write (0: 5s).
	ApplyTimeout time.Duration
	// RootKeyRetryMax caps the backoff between RMK fetch rounds (0: 5s).
	RootKeyRetryMax time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
	// Safety configures the Safety Condition checks of keyset lifecycle
	// steps (zero: safety defaults).
	Safety SafetyConfig
	// WrapLogStore is for tests and fault injection only (nil: none): it
	// wraps the Raft log store the replica runs with, e.g. to stall
	// StoreLogs like a slow disk (see raftnode.Config.WrapLogStore).
	WrapLogStore func(raft.LogStore) raft.LogStore
	// WrapStableStore is for tests and fault injection only (nil: none): it
	// wraps the Raft stable store (current term and last vote) the replica
	// runs with, e.g. to lose a term or vote write in flight at a simulated
	// crash (see raftnode.Config.WrapStableStore).
	WrapStableStore func(raft.StableStore) raft.StableStore
}

// MaxMessageSize bounds a request to the root KMS (rootkmsclient's, the
// same, bounds its answers): a RecordPropagation of a large region's keyset
// versions, far above the 64 KiB default.
const MaxMessageSize = rootkmsclient.MaxMessageSize

// SafetyConfig configures the root KMS's Safety Condition checks.
type SafetyConfig struct {
	// Window is the propagation window: how long every region must have
	// served a version before it may become primary, and the margin added
	// after the ciphertext TTL and after the last use seen before a version
	// may leave the decrypt set (0: safety.DefaultWindow).
	Window time.Duration
	// ObservationMaxAge is how recent every region's usage observation
	// (RecordPropagation) must be for a version to leave the decrypt set:
	// usage since the last observation is unknown, and unknown counts as in
	// use (0: the window).
	ObservationMaxAge time.Duration
	// MaxClockSkew is how far the leader's clock may be from the median
	// clock of a quorum of voters for it to judge a step on time (promote,
	// disable, schedule destroy, destroy); further, it refuses the step
	// (see clockquorum.go). 0: DefaultMaxClockSkew, or a quarter of the
	// window if that is less. It must be below the window, the margin a
	// step judged on a clock that far off would eat into.
	MaxClockSkew time.Duration
}

// Validate reports a configuration that cannot work.
func (c Config) Validate() error {
	var errs []error
	if c.ID == "" {
		errs = append(errs, errors.New("rootkms: no replica ID"))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("rootkms: no data directory"))
	}
	if c.Manifest == nil {
		errs = append(errs, errors.New("rootkms: no pinned genesis manifest"))
	}
	if len(c.Distributors) == 0 {
		errs = append(errs, errors.New("rootkms: no distributors to fetch the root key from"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("rootkms: no identity source"))
	}
	if c.Audit == nil {
		errs = append(errs, errors.New("rootkms: no audit log"))
	}
	if c.Safety.Window < 0 || c.Safety.ObservationMaxAge < 0 {
		errs = append(errs, errors.New("rootkms: negative safety window or observation age"))
	}
	if window := cmp.Or(c.Safety.Window, safety.DefaultWindow); c.Safety.MaxClockSkew < 0 || c.Safety.MaxClockSkew >= window {
		errs = append(errs, fmt.Errorf("rootkms: max clock skew %v must be at least 0 and below the safety window %v: a leader that far off the quorum's clock could judge a step a whole window early", c.Safety.MaxClockSkew, window))
	}
	if c.Bootstrap && len(c.Join) > 0 {
		errs = append(errs, errors.New("rootkms: bootstrap and join are exclusive"))
	}
	return errors.Join(errs...)
}

func (c *Config) setDefaults() error {
	td := c.Source.TrustDomain()
	def := func(a *identity.Allowlist, pattern string) error {
		if len(a.Patterns()) > 0 {
			return nil
		}
		l, err := identity.ParseAllowlist(td, pattern)
		*a = l
		return err
	}
	if err := errors.Join(def(&c.Regionctl, "regionctl/*/*"), def(&c.Operators, "operator/*/*"),
		def(&c.Replicas, "rootkms/*/*"), def(&c.DistributorIDs, "distributor/*/*"), def(&c.Officers, "officer/*/*")); err != nil {
		return err
	}
	for _, op := range c.Operators.Patterns() {
		for _, r := range c.Replicas.Patterns() {
			if overlap(op, r) {
				return fmt.Errorf("rootkms: operator pattern %s also matches replicas (%s): replicas are not operators", op, r)
			}
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.ApplyTimeout == 0 {
		c.ApplyTimeout = 5 * time.Second
	}
	if c.RootKeyRetryMax == 0 {
		c.RootKeyRetryMax = 5 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Safety.Window == 0 {
		c.Safety.Window = safety.DefaultWindow
	}
	if c.Safety.ObservationMaxAge == 0 {
		c.Safety.ObservationMaxAge = c.Safety.Window
	}
	if c.Safety.MaxClockSkew == 0 {
		c.Safety.MaxClockSkew = min(DefaultMaxClockSkew, c.Safety.Window/4)
	}
	return nil
}

// overlap reports whether some ID matches both patterns: the same trust
// domain, and in each path segment equal literals or a wildcard.
func overlap(a, b identity.Pattern) bool {
	as, bs := strings.SplitN(a.String(), "/", 6), strings.SplitN(b.String(), "/", 6)
	if len(as) != 6 || len(bs) != 6 || as[2] != bs[2] {
		return len(as) != 6 || len(bs) != 6 // unparsable: assume the worst
	}
	for i := 3; i < 6; i++ {
		if as[i] != bs[i] && as[i] != identity.Wildcard && bs[i] != identity.Wildcard {
			return false
		}
	}
	return true
}
