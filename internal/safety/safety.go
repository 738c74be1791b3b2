// Package safety decides Cairn's Safety Condition: every ciphertext produced
// within its keyset's TTL can be deciphered by a keyset the KMS serves.
//
// The package is pure: it reads no clock (now is always a parameter), does no
// I/O and imports only the standard library. Three callers ask it the same
// questions with different evidence:
//
//   - regionctl, fleet-wide (ScopeFleet), before a build, a push or a
//     lifecycle step, with the root KMS record and the usage reported by every
//     server of every region;
//   - the root KMS, before a lifecycle write (promote, disable, schedule
//     destroy, drop), with the same evidence;
//   - every regional KMS server, before applying a bundle (ScopeLocal), with
//     only its own persisted usage and TTL history, as defence in depth.
//
// The rules (Params.Window is the propagation window W):
//
//   - promote: a version becomes primary only after every region of the
//     keyset has served it decrypting on every server for W
//     (Version.Propagated[region] + W ≤ now); fleet-wide, every server of
//     those regions must also be known and serve it decrypting now;
//   - retire (leave the decrypt set): never while it is primary in the record
//     or on any server; after superseded_at + effective TTL + W; after every
//     server's last encrypt with it + effective TTL + W and last use + W; an
//     unknown server (unreachable, or usage not reported) counts as in use;
//   - a TTL decrease counts for retirement only once the old TTL has passed
//     since the decrease (EffectiveTTL).
//
// A refusal is a *Refusal (several: Refusals); errors.Is(err, ErrUnsafe)
// holds for each. No flag overrides a refusal: there is deliberately no
// force parameter.
package safety

import (
	"errors"
	"fmt"
	"time"
)

// ErrUnsafe is matched (errors.Is) by every refusal of this package. Errors
// that are not refusals (invalid Params or Scope) do not match it.
var ErrUnsafe = errors.New("safety: unsafe")

// DefaultWindow is the default propagation window: the time a change must
// have been served everywhere before the next dependent step, covering
// clients' and servers' caches and in-flight requests.
const DefaultWindow = 10 * time.Minute

// Params are the tunables of the Safety Condition.
type Params struct {
	// Window is the propagation window W. It must be positive; see
	// DefaultWindow.
	Window time.Duration
}

// DefaultParams returns Params with Window = DefaultWindow.
func DefaultParams() Params { return Params{Window: DefaultWindow} }

// Validate reports whether p is usable: Window > 0. The zero Params is
// invalid on purpose: a zero window would let a version become primary the
// instant its last region loaded it.
func (p Params) Validate() error {
	if p.Window <= 0 {
		return fmt.Errorf("safety: propagation window must be positive, got %v", p.Window)
	}
	return nil
}

// Scope says which servers a check must account for.
type Scope uint8

const (
	// ScopeFleet is the fleet-wide check (regionctl, root KMS): the Fleet lists
	// every server of every region. A server of a relevant region that is not
	// Known blocks every retirement and every promotion (unknown counts as in
	// use), with no computable earliest time.
	ScopeFleet Scope = iota + 1
	// ScopeLocal is one KMS server's defence-in-depth check before it applies
	// a bundle: the Fleet holds only the servers whose usage the caller has
	// (usually itself). Servers not listed do not block; listed servers are
	// judged as in ScopeFleet. Promotions are judged on the record alone (the
	// Propagated times), not on other servers' current content.
	ScopeLocal
)

// String returns "fleet", "local" or "scope(N)".
func (s Scope) String() string {
	switch s {
	case ScopeFleet:
		return "fleet"
	case ScopeLocal:
		return "local"
	}
	return fmt.Sprintf("scope(%d)", uint8(s))
}

func (s Scope) validate() error {
	if s != ScopeFleet && s != ScopeLocal {
		return fmt.Errorf("safety: unknown scope %v", s)
	}
	return nil
}
