//! Fleet logic (deploy, replace, rollback, drain, gc), written once over the provider trait.
