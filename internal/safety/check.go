package safety

import (
	"fmt"
	"maps"
	"slices"
	"time"
)

// CheckPromote decides whether version keyID of k may become primary at now.
// It returns nil or a *Refusal. It refuses unless:
//
//   - the record has the version, Enabled (or already Primary: promoting
//     again is a no-op and judged the same way);
//   - k lists at least one region, and for every region R of k.Regions,
//     Propagated[R] is set and Propagated[R] + p.Window ≤ now;
//   - in ScopeFleet, every server of those regions in fleet is Known and
//     serves the version decrypting, except a Known server that serves
//     nothing at all (it answers no request).
//
// A keyset's first version (Primary, PrimarySince equal to Created, never
// superseded) was never promoted over another and always passes.
// Invalid p or scope give a non-refusal error.
func CheckPromote(k Keyset, keyID uint32, fleet Fleet, scope Scope, p Params, now time.Time) error {
	if err := validate(p, scope); err != nil {
		return err
	}
	c := checker{name: k.Name, k: &k, fleet: fleet, scope: scope, p: p, now: now}
	if r := c.promote(keyID, ""); r != nil {
		return r
	}
	return nil
}

// CheckRetire decides whether version keyID of k may leave the decrypt set at
// now (disable, schedule destroy, drop from every bundle, drop the keyset).
// It returns nil or a *Refusal. With W = p.Window and E = EffectiveTTL(k.TTL,
// now), it refuses when:
//
//   - the version is Primary in the record, or serves as primary on a server;
//   - it was ever primary (PrimarySince or SupersededAt set) and
//     SupersededAt + E + W > now (or SupersededAt is unknown);
//   - a server encrypted with it at t and t + E + W > now;
//   - a server used it (encrypt or decrypt) at t and t + W > now;
//   - a server lost its history at h (Server.HistoryFrom), the version was
//     created before h (or its creation is unknown) and h + E + W > now;
//   - a relevant server is not Known (unknown counts as in use);
//   - a rule needs E and k.TTL is empty (unknown TTL).
//
// Relevant servers: in ScopeFleet, those of k.Regions plus every Known server
// that reports the keyset; in ScopeLocal, every server listed. A version the
// record lacks is judged on server usage alone. Invalid p or scope give a
// non-refusal error.
func CheckRetire(k Keyset, keyID uint32, fleet Fleet, scope Scope, p Params, now time.Time) error {
	if err := validate(p, scope); err != nil {
		return err
	}
	c := checker{name: k.Name, k: &k, fleet: fleet, scope: scope, p: p, now: now}
	if r := c.retire(keyID, ""); r != nil {
		return r
	}
	return nil
}

// CheckBundle decides whether a server of region may go from serving cur to
// serving next at now. record maps keyset names to their lifecycle records;
// fleet and scope are as for CheckRetire. It returns nil or Refusals (in
// keyset, key ID, step order):
//
//   - every version that decrypts in cur but not in next (disabled, dropped,
//     or its keyset dropped) is judged as CheckRetire would, with region
//     counted among the keyset's regions;
//   - every version primary in next but not in cur is judged as CheckPromote
//     would, with region counted among the keyset's regions; moreover, for a
//     keyset cur serves, a version that next adds and makes primary at once
//     is refused whatever the record says (ship it decrypt-only first);
//   - a keyset missing from record is judged on what there is: a retirement
//     on server usage only, refusing whenever a TTL would be needed; a
//     promotion is refused. The blockers say so.
//
// An empty or nil cur is a server serving nothing: only next's promotions are
// judged. Invalid p or scope give a non-refusal error.
func CheckBundle(region string, cur, next Content, record map[string]Keyset, fleet Fleet, scope Scope, p Params, now time.Time) error {
	if err := validate(p, scope); err != nil {
		return err
	}
	var out Refusals
	names := slices.Sorted(maps.Keys(cur))
	for name := range next {
		if _, ok := cur[name]; !ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		c := checker{name: name, fleet: fleet, scope: scope, p: p, now: now}
		if k, ok := record[name]; ok {
			c.k = &k
		}
		cv, nv := cur[name], next[name]
		ids := slices.Sorted(maps.Keys(cv))
		for id := range nv {
			if _, ok := cv[id]; !ok {
				ids = append(ids, id)
			}
		}
		slices.Sort(ids)
		for _, id := range ids {
			was, will := cv[id], nv[id]
			if was.decrypting() && !will.decrypting() {
				if r := c.retire(id, region); r != nil {
					out = append(out, r)
				}
			}
			if will.Primary && !was.Primary {
				r := c.promote(id, region)
				// A keyset new to this server (absent from cur) necessarily
				// adds its primary; only the record judges it.
				if cv != nil && !was.decrypting() {
					if r == nil {
						r = &Refusal{Keyset: name, KeyID: id, Step: StepPromote}
					}
					r.add(region, "", "is pushed a bundle that adds it and makes it primary at once; ship it decrypt-only first", time.Time{})
					r = r.done()
				}
				if r != nil {
					out = append(out, r)
				}
			}
		}
	}
	if len(out) > 0 {
		return out
	}
	return nil
}

func validate(p Params, scope Scope) error {
	if err := p.Validate(); err != nil {
		return err
	}
	return scope.validate()
}

// checker judges the versions of one keyset. k is nil when the record lacks
// the keyset.
type checker struct {
	name  string
	k     *Keyset
	fleet Fleet
	scope Scope
	p     Params
	now   time.Time
}

// regions returns the keyset's regions plus extra (if not empty).
func (c *checker) regions(extra string) map[string]bool {
	set := map[string]bool{}
	if c.k != nil {
		for _, r := range c.k.Regions {
			set[r] = true
		}
	}
	if extra != "" {
		set[extra] = true
	}
	return set
}

// ttl returns the effective TTL at now and whether it is known, with the
// words for a blocker when it is not.
func (c *checker) ttl() (time.Duration, bool, string) {
	switch {
	case c.k == nil:
		return 0, false, "the keyset is not in the record, so its TTL is unknown"
	case len(c.k.TTL) == 0:
		return 0, false, "the record has no TTL history for the keyset"
	}
	return EffectiveTTL(c.k.TTL, c.now), true, ""
}

// version returns the record of keyID, or nil.
func (c *checker) version(keyID uint32) *Version {
	if c.k == nil {
		return nil
	}
	for i := range c.k.Versions {
		if c.k.Versions[i].KeyID == keyID {
			return &c.k.Versions[i]
		}
	}
	return nil
}

// promote implements CheckPromote, with extraRegion counted among the
// keyset's regions.
func (c *checker) promote(keyID uint32, extraRegion string) *Refusal {
	r := &Refusal{Keyset: c.name, KeyID: keyID, Step: StepPromote}
	v := c.version(keyID)
	switch {
	case c.k == nil:
		r.add("", "", "the keyset is not in the record, so propagation cannot be shown", time.Time{})
		return r.done()
	case v == nil:
		r.add("", "", "the version is not in the record", time.Time{})
		return r.done()
	case v.State != Enabled && v.State != Primary:
		r.add("", "", fmt.Sprintf("the version is %s in the record, not enabled", v.State), time.Time{})
	case v.firstPrimary():
		// The keyset's first version: primary from the keyset's creation,
		// never promoted over another, so no server could have served an
		// older primary that cannot decrypt what it makes.
		return nil
	}
	regions := c.regions(extraRegion)
	if len(regions) == 0 {
		r.add("", "", "the record lists no region for the keyset", time.Time{})
	}
	for _, region := range slices.Sorted(maps.Keys(regions)) {
		since, ok := v.Propagated[region]
		switch {
		case !ok:
			r.add(region, "", "has not served it decrypting on every server yet", time.Time{})
		case since.Add(c.p.Window).After(c.now):
			r.add(region, "", fmt.Sprintf("has served it decrypting only since %s (window %v)", stamp(since), c.p.Window), since.Add(c.p.Window))
		}
	}
	if c.scope == ScopeFleet {
		for _, s := range c.fleet.Servers {
			if !regions[s.Region] {
				continue
			}
			switch {
			case !s.Known:
				r.add(s.Region, s.Name, "is unreachable or its usage is unknown", time.Time{})
			case s.servesNothing():
				// It answers no request; it will get the keyset with the version.
			case !s.Keysets[c.name].Versions[keyID].decrypting():
				r.add(s.Region, s.Name, "does not serve it decrypting", time.Time{})
			}
		}
	}
	return r.done()
}

// retire implements CheckRetire, with extraRegion counted among the keyset's
// regions.
func (c *checker) retire(keyID uint32, extraRegion string) *Refusal {
	r := &Refusal{Keyset: c.name, KeyID: keyID, Step: StepRetire}
	w := c.p.Window
	ttl, ttlKnown, noTTL := c.ttl()
	v := c.version(keyID)
	if v != nil {
		switch {
		case v.State == Primary:
			r.add("", "", "it is primary in the record", time.Time{})
		case v.PrimarySince.IsZero() && v.SupersededAt.IsZero():
			// Never primary in the record: server usage decides.
		case v.SupersededAt.IsZero():
			r.add("", "", "it was primary and the record has no time it was superseded", time.Time{})
		case !ttlKnown:
			r.add("", "", fmt.Sprintf("it was superseded at %s and %s", stamp(v.SupersededAt), noTTL), time.Time{})
		default:
			if t := v.SupersededAt.Add(ttl + w); t.After(c.now) {
				r.add("", "", fmt.Sprintf("it was superseded at %s (effective TTL %v, window %v)", stamp(v.SupersededAt), ttl, w), t)
			}
		}
	}
	regions := c.regions(extraRegion)
	for _, s := range c.fleet.Servers {
		sk, reports := s.Keysets[c.name]
		if c.scope == ScopeFleet && !regions[s.Region] && !(s.Known && reports) {
			continue
		}
		if !s.Known {
			r.add(s.Region, s.Name, "is unreachable or its usage is unknown", time.Time{})
			continue
		}
		sv := sk.Versions[keyID]
		if sv.Primary {
			r.add(s.Region, s.Name, "serves it as primary", time.Time{})
		}
		if !sv.LastEncrypt.IsZero() {
			if !ttlKnown {
				r.add(s.Region, s.Name, fmt.Sprintf("encrypted with it at %s and %s", stamp(sv.LastEncrypt), noTTL), time.Time{})
			} else if t := sv.LastEncrypt.Add(ttl + w); t.After(c.now) {
				r.add(s.Region, s.Name, fmt.Sprintf("encrypted with it at %s (effective TTL %v, window %v)", stamp(sv.LastEncrypt), ttl, w), t)
			}
		}
		if t := sv.LastUse.Add(w); !sv.LastUse.IsZero() && t.After(c.now) {
			r.add(s.Region, s.Name, fmt.Sprintf("used it at %s (window %v)", stamp(sv.LastUse), w), t)
		}
		if h := s.HistoryFrom; !h.IsZero() && (v == nil || v.Created.IsZero() || v.Created.Before(h)) {
			if !ttlKnown {
				r.add(s.Region, s.Name, fmt.Sprintf("lost its usage history at %s and %s", stamp(h), noTTL), time.Time{})
			} else if t := h.Add(ttl + w); t.After(c.now) {
				r.add(s.Region, s.Name, fmt.Sprintf("lost its usage history at %s, so may have encrypted with it until then (effective TTL %v, window %v)", stamp(h), ttl, w), t)
			}
		}
	}
	return r.done()
}
