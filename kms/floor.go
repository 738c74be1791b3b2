package kms

import (
	"context"
	"errors"
	"fmt"

	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// SerialFloor reports a region's bundle serial floor from the record: the
// highest bundle serial recorded as delivered to the region's servers (0:
// none yet). A server learns it before it applies its first bundle, so an
// old signed bundle cannot be replayed onto a server whose state directory
// is fresh (or was lost): its own floor, the persisted bundle, says nothing
// then.
type SerialFloor interface {
	SerialFloor(ctx context.Context, region string) (uint64, error)
}

// errFloorUnknown: the record's serial floor could not be learned, and the
// server has no floor of its own.
var errFloorUnknown = errors.New("kms: the region's bundle serial floor is unknown")

// checkRecordFloor refuses b if its serial is below the record's floor for
// the region. The floor is asked for once (Config.SerialFloor, bounded by
// FetchTimeout) and kept: the server's own floor, the bundle it serves,
// only rises from there. If the record cannot be asked, a server that has a
// floor of its own (own: a bundle served or persisted) goes on with it, and
// one that has none refuses (fail closed; it could not load a bundle
// without the root KMS anyway, as it needs the region keys from it).
// Callers hold applyMu.
func (s *Server) checkRecordFloor(ctx context.Context, b *bundlev1.Bundle, own *bundlev1.BundleRef) error {
	if s.cfg.SerialFloor == nil {
		return nil
	}
	if !s.recordFloorKnown {
		fctx, cancel := context.WithTimeout(ctx, s.cfg.FetchTimeout)
		floor, err := s.cfg.SerialFloor.SerialFloor(fctx, s.cfg.Region)
		cancel()
		switch {
		case err == nil:
			s.recordFloor, s.recordFloorKnown = floor, true
			s.log.Info("kms: learned the region's bundle serial floor from the record", "floor", floor)
		case own != nil:
			s.log.Warn("kms: cannot learn the region's bundle serial floor from the record; going on with this server's own (the bundle it serves or persisted)",
				"own_serial", own.GetSerial(), "err", err)
			return nil
		default:
			return fmt.Errorf("%w: this server has applied no bundle, and asking the record failed: %v; it refuses every bundle until it can ask (a replayed old bundle must not become its first)",
				errFloorUnknown, err)
		}
	}
	if b.GetSerial() < s.recordFloor {
		return fmt.Errorf("%w: serial %d is below the region's bundle serial floor %d (the highest serial the record says was delivered to %s)",
			errReplay, b.GetSerial(), s.recordFloor, s.cfg.Region)
	}
	return nil
}

// SerialFloor implements SerialFloor with GetRegion (a linearizable read,
// via the leader).
func (r *RootKMSRegionKeys) SerialFloor(ctx context.Context, region string) (uint64, error) {
	var floor uint64
	err := r.client.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) error {
		reg, err := c.GetRegion(ctx, &rootkmsv1.GetRegionRequest{Region: region})
		floor = reg.GetBundleSerialFloor()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("kms: GetRegion(%s): %w", region, err)
	}
	return floor, nil
}
