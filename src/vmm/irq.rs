//! Interrupt routing shared by every device that sets GSI routes.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so a caller that adds MSI routes (GSIs from
//! [`layout::MSI_GSI_START`] up) must send them together with [`irqchip_routes`], which
//! reproduces KVM's default wiring of the in-kernel irqchip: ISA IRQs 0..15 to the 8259 pair
//! and GSIs 0..23 to the IOAPIC pins of the same number (what the MP table and MADT describe).

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
};

use super::layout;

const PIC_IRQS: u32 = 16;
const PIC_PINS_PER_CHIP: u32 = 8;

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

/// The routes for GSIs 0..23 as KVM sets them up with KVM_CREATE_IRQCHIP.
pub fn irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let pic = (0..PIC_IRQS).map(|irq| {
        let chip = if irq < PIC_PINS_PER_CHIP {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        irqchip_route(irq, chip, irq % PIC_PINS_PER_CHIP)
    });
    let ioapic = (0..layout::IOAPIC_PINS).map(|pin| irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
    pic.chain(ioapic).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip_and_pin(entry: &kvm_irq_routing_entry) -> (u32, u32) {
        // SAFETY: every entry built here is an irqchip route.
        let irqchip = unsafe { entry.u.irqchip };
        (irqchip.irqchip, irqchip.pin)
    }

    #[test]
    fn isa_irqs_reach_both_pics_and_the_ioapic() {
        let routes = irqchip_routes();
        assert_eq!(routes.len(), 16 + 24);
        let serial: Vec<(u32, u32)> = routes
            .iter()
            .filter(|r| r.gsi == layout::SERIAL_IRQ)
            .map(chip_and_pin)
            .collect();
        assert_eq!(
            serial,
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        let gsi_10: Vec<(u32, u32)> = routes
            .iter()
            .filter(|r| r.gsi == 10)
            .map(chip_and_pin)
            .collect();
        assert_eq!(
            gsi_10,
            vec![(KVM_IRQCHIP_PIC_SLAVE, 2), (KVM_IRQCHIP_IOAPIC, 10)]
        );
    }

    #[test]
    fn no_route_reaches_into_the_msi_range() {
        assert!(irqchip_routes()
            .iter()
            .all(|r| r.gsi < layout::MSI_GSI_START));
    }
}
